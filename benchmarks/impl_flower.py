"""W on Flower's simulation engine (flwr 1.41, Message API): a ServerApp with FedAvg and a ClientApp on Ray.

    python benchmarks/impl_flower.py --model mlp --rounds 12 --out /tmp/flower.json

How W maps onto Flower:

- `flwr.simulation.run_simulation` with 100 virtual SuperNodes and the Ray backend. Ray is started by
  Flower with `init_args` num_cpus=2 and address="local" (a new local cluster, never an existing one);
  every ClientApp gets `client_resources` num_cpus=1, so Flower's actor pool has 2 actors and 2 clients
  train at once, each with 1 torch thread. Flower shuts Ray down when the simulation ends.
- strategy: `flwr.serverapp.strategy.FedAvg` (fraction_train=0.1 -> 10 of 100 nodes per round,
  fraction_evaluate=0 -> no client-side evaluation), weighted by the "num-examples" each client reports
  (its 600 samples), initial arrays = the shared initial weights. Flower averages the clients' weights
  (not deltas) in float32; the floor averages deltas in float64, which gives the same model up to rounding.
- cohorts: the subclass `CohortFedAvg` only replaces FedAvg's random node sampling in `configure_train` so
  that Flower trains exactly `workload.cohort(w, round)`. Flower's SuperNode ids are random and the
  ServerApp cannot see which node holds which partition-id, so the ServerApp numbers the nodes by sorted
  id, sends client c's message to node c, and names c in that message's config; the ClientApp trains on
  partition c (all virtual nodes are identical and stateless, so this is the same work a node whose own
  partition-id is c would do).
- client: loads the shared data once per Ray actor (cached at module level, which is why the ClientApp's
  functions live in the importable module `impl_flower`, not in `__main__`), trains 1 epoch of batch-10
  SGD (lr 0.05) on the client's 600 images shuffled by `torch.randperm` with a generator seeded by
  `workload.shuffle_seed(w, round, client)` (as the floor does) and replies with its weights and
  num-examples.
- evaluation: Flower's central `evaluate_fn` evaluates the global model on the 10,000 test images in the
  ServerApp (in this process) after every round and reports to `RoundClock`; Flower's extra round-0
  evaluation of the initial weights is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
import workload
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.simulation import run_simulation
from torch import nn

from raypfl.models.weights import set_flat
from raypfl.models.zoo import build_model

EVAL_BATCH = 256

# ---------------------------------------------------------------------------------------------------------
# ClientApp (runs in Flower's Ray actors)
# ---------------------------------------------------------------------------------------------------------

client_app = ClientApp()
_client_state: dict[str, tuple] = {}  # per actor process: workload json -> (x, y, partition, model)


def _client_setup(w_json: str) -> tuple:
    if w_json not in _client_state:
        torch.set_num_threads(1)
        w = workload.Workload(**json.loads(w_json))
        data, partition, _ = workload.load(w)
        model = build_model(w.model, data.in_shape, data.num_classes)
        x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
        _client_state[w_json] = (w, x, y, partition, model)
    return _client_state[w_json]


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    w, x, y, partition, model = _client_setup(str(config["workload"]))
    round_idx, client = int(config["server-round"]), int(config["client"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    idx = torch.from_numpy(np.array(partition.indices(client)))
    optimizer = torch.optim.SGD(model.parameters(), lr=w.lr)
    generator = torch.Generator().manual_seed(workload.shuffle_seed(w, round_idx, client))
    model.train()
    for _ in range(w.local_epochs):
        order = idx[torch.randperm(len(idx), generator=generator)]
        for start in range(0, len(order), w.batch_size):
            batch = order[start : start + w.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(idx)})}
    )
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------------------------------------
# ServerApp (runs in a thread of this process)
# ---------------------------------------------------------------------------------------------------------


class CohortFedAvg(FedAvg):
    """FedAvg whose training cohort of round r is `workload.cohort(w, r)` instead of a random sample."""

    def __init__(self, w: workload.Workload, **kwargs):
        super().__init__(**kwargs)
        self.w = w

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, self.w.per_round)  # waits for all nodes
        nodes = sorted(all_nodes)
        messages = []
        for client in workload.cohort(self.w, server_round):
            client_config = ConfigRecord({**config, "server-round": server_round, "client": client})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: client_config})
            messages.append(
                Message(content=record, message_type=MessageType.TRAIN, dst_node_id=nodes[client])
            )
        return messages


def make_server_app(w: workload.Workload, clock: workload.RoundClock) -> ServerApp:
    data, _, weights = workload.load(w)
    test_x, test_y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    model: nn.Module = build_model(w.model, data.in_shape, data.num_classes)
    set_flat(model, weights)
    initial_arrays = ArrayRecord(model.state_dict())

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower evaluates the initial weights too; W does not
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(test_x[s : s + EVAL_BATCH]).argmax(1) == test_y[s : s + EVAL_BATCH]).sum())
                for s in range(0, len(test_y), EVAL_BATCH)
            )
        accuracy = correct / len(test_y)
        clock.round_done(server_round, accuracy)
        return MetricRecord({"accuracy": accuracy})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = CohortFedAvg(
            w,
            fraction_train=w.per_round / w.num_clients,
            fraction_evaluate=0.0,
            min_train_nodes=w.per_round,
            min_available_nodes=w.num_clients,
            weighted_by_key="num-examples",
        )
        strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=w.rounds,
            train_config=ConfigRecord({"workload": json.dumps(dataclasses.asdict(w))}),
            evaluate_fn=central_evaluate,
        )

    return server_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload.add_arguments(parser)
    args = parser.parse_args()
    w = workload.from_args(args)
    torch.set_num_threads(1)
    clock = workload.RoundClock("flower", w, args.out)
    run_simulation(
        server_app=make_server_app(w, clock),
        client_app=client_app,
        num_supernodes=w.num_clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "num_gpus": 0, "address": "local"},
        },
    )
    if len(clock.rounds) != w.rounds:
        raise SystemExit(f"flower: {len(clock.rounds)} of {w.rounds} rounds finished")
    clock.write()


if __name__ == "__main__":
    # Run as the importable module `impl_flower`, so that Ray pickles the ClientApp's functions by
    # reference and each actor keeps its data cache (functions of `__main__` would be pickled by value).
    import impl_flower

    impl_flower.main()
