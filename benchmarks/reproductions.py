"""Reproduce published findings by config and collect their tables and plots in benchmarks/results/.

    python benchmarks/reproductions.py fedprox      # FedProx, stragglers on Synthetic(1,1)   (~5 min)
    python benchmarks/reproductions.py niid         # NIID-Bench MNIST Dir(0.5), 4 algorithms (~20 min)
    python benchmarks/reproductions.py fairness     # q-FFL, q = 0, 1, 5                      (~4 min)
    python benchmarks/reproductions.py personal     # Ditto and FedPer vs FedAvg              (~5 min)
    python benchmarks/reproductions.py robust --jobs 2    # 6 aggregators x 7 attacks           (~10 min)
    python benchmarks/reproductions.py dp --jobs 2        # DP-FedAvg, accuracy vs epsilon       (~5 min)
    python benchmarks/reproductions.py compress --jobs 2  # top-k, error feedback, quantization  (~3 min)
    python benchmarks/reproductions.py fairness -- train.rounds=10   # extra overrides after --
    python benchmarks/reproductions.py fairness --collect   # only rebuild the tables from the runs' folders

Each study is one shipped experiment (conf/experiment/*.yaml) run once per variant with `python -m raypfl`
into OUT/STUDY/VARIANT (default OUT: outputs/reproductions). The script then writes
benchmarks/results/repro_STUDY.{csv,md,png}: per variant the final figures, the mean test accuracy and
loss of the last 10 evaluations (`acc_last10`, `loss_last10`: less noisy than the last one), and the run's
wall time.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's raypfl
    sys.path.insert(0, str(REPO))

from raypfl.tracking.tracker import METRIC_COLUMNS  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

#: study -> (experiment config, [(variant label, overrides)])
STUDIES: dict[str, tuple[str, list[tuple[str, list[str]]]]] = {
    "fedprox": (
        "fedprox_stragglers",
        [
            ("FedAvg (stragglers dropped)", ["algorithm.mu=0", "clients.partial_work_policy=drop"]),
            ("FedProx mu=0 (partial work kept)", ["algorithm.mu=0"]),
            ("FedProx mu=1 (partial work kept)", ["algorithm.mu=1"]),
        ],
    ),
    "niid": (
        "niid_bench",
        [
            ("FedAvg", ["algorithm=fedavg"]),
            ("FedProx mu=0.01", ["algorithm=fedprox"]),
            ("SCAFFOLD (momentum 0)", ["algorithm=scaffold", "optim.momentum=0"]),
            ("FedNova", ["algorithm=fednova"]),
        ],
    ),
    "fairness": (
        "qffl_fairness",
        [
            # q = 0 does not depend on L (its step is the plain mean of the local models)
            *[(f"q-FFL q={q}, L=1/lr", [f"algorithm.q={q}"]) for q in (0, 1, 5)],
            *[
                (f"q-FFL q={q}, L={lip}", [f"algorithm.q={q}", f"algorithm.lipschitz={lip}"])
                for lip in (1, 0.01)
                for q in (1, 5)
            ],
        ],
    ),
    "personal": (
        "personalization",
        [
            ("FedAvg", ["algorithm=fedavg"]),
            ("Ditto", ["algorithm=ditto"]),
            ("FedPer", ["algorithm=fedper"]),
        ],
    ),
}
#: Robust aggregators (issue 16): each with the knobs that tolerate the largest attack of the table (30% of a
#: cohort of 10: Krum's f = 3 since 10 > 2f + 2; a trimmed mean that cuts 3 per side)
AGGREGATORS = [
    ("FedAvg (mean)", ["aggregator=mean"]),
    ("median", ["aggregator=median"]),
    ("trimmed mean b=0.3", ["aggregator=trimmed_mean", "aggregator.beta=0.3"]),
    ("Krum f=3", ["aggregator=krum", "aggregator.f=3"]),
    ("Multi-Krum f=3", ["aggregator=multikrum", "aggregator.f=3"]),
    ("geometric median (RFA)", ["aggregator=rfa"]),
]
ATTACKS = [("no attack", ["attack.kind=none", "attack.fraction=0"])] + [
    (f"{kind} {pct}%", [f"attack.kind={kind}", f"attack.fraction={pct / 100}"])
    for kind in ("sign_flip", "scaled")
    for pct in (10, 20, 30)
]
STUDIES["robust"] = (
    "robust",
    [(f"{a} / {k}", [*a_args, *k_args]) for a, a_args in AGGREGATORS for k, k_args in ATTACKS],
)
STUDIES["dp"] = (
    "dp_fedavg",
    [
        ("no DP (no clipping, no noise)", ["postprocess=[]", "privacy.epsilon=null"]),
        ("eps=inf (clipping only)", ["postprocess=[clip]", "privacy.epsilon=null"]),
        *[
            (f"eps={eps}, {label}", [f"privacy.epsilon={eps}", *extra])
            for label, extra in (
                ("M=1000 of P=100000", []),
                ("M=100 of P=10000", ["privacy.noise_cohort_size=100", "privacy.population=10000"]),
            )
            for eps in (8, 4, 2, 1)
        ],
        (
            "eps=8, noise for the simulated cohort (M=10 of P=100)",
            ["privacy.epsilon=8", "privacy.noise_cohort_size=null", "privacy.population=null"],
        ),
    ],
)
HALF = ["clients.num=20", "dataset.train_limit=12000"]
STUDIES["compress"] = (
    "compress",
    [
        ("uncompressed", ["postprocess=[]"]),
        ("top-k 10%, error feedback", ["topk.fraction=0.1"]),
        ("top-k 10%, no error feedback", ["topk.fraction=0.1", "topk.error_feedback=false"]),
        ("top-k 1%, error feedback", ["topk.fraction=0.01"]),
        ("top-k 1%, no error feedback", ["topk.fraction=0.01", "topk.error_feedback=false"]),
        ("8-bit quantization", ["postprocess=[quantize]", "quantize.bits=8"]),
        ("4-bit quantization", ["postprocess=[quantize]", "quantize.bits=4"]),
        ("top-k 10% + 8-bit, error feedback", ["postprocess=[topk,quantize]", "topk.fraction=0.1"]),
        # half the clients every round (20 of 600 images each): a residual returns every ~2 rounds, not ~10
        *[
            (f"top-k 1%, {ef}, 10 of 20 clients", ["topk.fraction=0.01", *flag, *HALF])
            for ef, flag in (("error feedback", []), ("no error feedback", ["topk.error_feedback=false"]))
        ],
        ("uncompressed, 10 of 20 clients", ["postprocess=[]", *HALF]),
    ],
)
#: Studies run on the sequential runtime (many short runs: no Ray start-up each)
SEQUENTIAL = ("robust", "dp", "compress")
#: Studies whose table also gets the final model's training loss over every client (`train_loss_all`)
TRAINING_LOSS = ("fedprox",)
#: metrics.csv columns reported (the last value each run logged): test accuracy and loss, and the per-client
#: evaluation's summary
COLUMNS = [
    "test_acc",
    "test_loss",
    *(c for c in METRIC_COLUMNS if c.startswith(("client_acc_", "personal_acc_"))),
    "epsilon",
    "dp_noise_std",
]


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run_variant(experiment: str, overrides: list[str], out: Path, quiet: bool = False) -> float:
    """One run of the study; returns its wall time in seconds (`quiet`: its output to OUT.log)."""
    command = [sys.executable, "-m", "raypfl", f"+experiment={experiment}", *overrides]
    command += [f"hydra.run.dir={out}", "overwrite=true"]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    if quiet:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".log"), "w") as log:
            subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    else:
        subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start


def last_values(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The last non-empty value of each column of a metrics.csv (and the mean of the last 10 evaluations'
    test accuracy and loss), and all its rows."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    last = {}
    for column in COLUMNS:
        values = [r[column] for r in rows if r.get(column, "") != ""]
        last[column] = values[-1] if values else ""
    evaluated = [r for r in rows if r["test_acc"] != ""][-10:]
    last["acc_last10"] = sum(float(r["test_acc"]) for r in evaluated) / len(evaluated)
    last["loss_last10"] = sum(float(r["test_loss"]) for r in evaluated) / len(evaluated)
    return last, rows


def training_loss(out: Path) -> float:
    """The final model's mean cross-entropy on every client's training data, weighted by samples (the FedProx
    paper's "training loss"), from the run's folder."""
    import torch
    from omegaconf import OmegaConf

    from raypfl.data.load import load_data
    from raypfl.driver.experiment import build_setup
    from raypfl.models.zoo import build_model, model_spec
    from raypfl.training.local import evaluate

    cfg = OmegaConf.load(out / "config.yaml")
    setup = build_setup(cfg, load_data(cfg))
    model = build_model(model_spec(cfg.model), setup.dataset.in_shape, setup.dataset.num_classes)
    model.load_state_dict(torch.load(out / "model.pt"))
    total = count = 0.0
    for client in range(setup.partition.num_clients):
        if hasattr(setup.partition, "client_data"):
            x, y = (torch.as_tensor(a) for a in setup.partition.client_data(client))
        else:
            rows = torch.as_tensor(setup.partition.indices(client))
            x, y = torch.as_tensor(setup.dataset.train_x)[rows], torch.as_tensor(setup.dataset.train_y)[rows]
        loss, _, n = evaluate(model, x, y)
        total, count = total + loss, count + n
    return total / count


def last_row(path: Path) -> dict[str, str]:
    with path.open() as f:
        return list(csv.DictReader(f))[-1]


def write_tables(study: str, records: list[dict], curves: dict[str, list[dict[str, str]]]) -> None:
    reported = [*COLUMNS[:2], "acc_last10", "loss_last10", "train_loss_all", *COLUMNS[2:], "mb_up_round"]
    present = [c for c in reported if any(r.get(c, "") != "" for r in records)]
    columns = ["variant", *present, "rounds", "wall_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / f"repro_{study}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in records:
        cells = []
        for column in columns:
            value = record.get(column, "")
            percent = column.endswith(("_acc", "_mean", "_worst10", "_std", "acc_last10"))
            if percent and column != "dp_noise_std" and value != "":
                value = f"{100 * float(value):.2f}"  # percent
            elif column in ("test_loss", "loss_last10", "train_loss_all") and value != "":
                value = f"{float(value):.4f}"
            elif column == "wall_s" and value != "":
                value = f"{float(value):.0f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    (RESULTS / f"repro_{study}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(study, curves)


def plot(study: str, curves: dict[str, list[dict[str, str]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in curves.items():
        points = [
            (int(r["round"]), float(r["test_acc"]), float(r["test_loss"])) for r in rows if r["test_acc"]
        ]
        ax_acc.plot([p[0] for p in points], [100 * p[1] for p in points], label=label)
        ax_loss.plot([p[0] for p in points], [p[2] for p in points], label=label)
    ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title=f"{study}: test accuracy")
    ax_loss.set(xlabel="round", ylabel="test loss", title=f"{study}: test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"repro_{study}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "reproductions")
    parser.add_argument("--collect", action="store_true", help="do not run: tables from the runs' folders")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each is one process)")
    parser.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    args = parser.parse_args()
    experiment, variants = STUDIES[args.study]
    runtime = ["runtime=sequential"] if args.study in SEQUENTIAL else []
    folders = {label: args.out / args.study / slug(label) for label, _ in variants}
    walls: dict[str, float] = {}
    if not args.collect:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                label: pool.submit(
                    run_variant, experiment, [*runtime, *o, *args.extra], folders[label], args.jobs > 1
                )
                for label, o in variants
            }
            walls = {label: future.result() for label, future in futures.items()}
    records, curves = [], {}
    for label, _ in variants:
        out = folders[label]
        # --collect: the wall time the run recorded (from its process start)
        wall = walls.get(label) or float(last_row(out / "metrics.csv")["wall_s"])
        last, rows = last_values(out / "metrics.csv")
        if args.study in TRAINING_LOSS:
            last["train_loss_all"] = round(training_loss(out), 4)
        if args.study == "compress":  # what the cohort's updates would cost on the wire, per round
            last["mb_up_round"] = round(sum(float(r["bytes_up"]) for r in rows) / len(rows) / 1e6, 3)
        records.append({"variant": label, **last, "rounds": len(rows), "wall_s": round(wall, 1)})
        curves[label] = rows
    write_tables(args.study, records, curves)
    if args.study == "robust":
        write_pivot(records)


def write_pivot(records: list[dict]) -> None:
    """repro_robust_table.md: final test accuracy (%), aggregators x attacks."""
    accuracy = {r["variant"]: 100 * float(r["test_acc"]) for r in records}
    attacks = [k for k, _ in ATTACKS]
    lines = ["| aggregator | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for name, _ in AGGREGATORS:
        cells = [f"{accuracy[f'{name} / {k}']:.1f}" for k in attacks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "repro_robust_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
