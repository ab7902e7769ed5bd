"""Models: the zoo and its registry (`zoo`: shipped names or your `_target_`), a model's weights as one flat
vector (`weights`), the initial model and the saved one (`io`)."""
