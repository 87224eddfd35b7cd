"""The one training protocol: the loop (`loop.fit`: warm-up, reduce-on-plateau, early stopping,
convergence and failed-training evidence), the one recipe (`recipe`: `TrainRecipe`, `build_recipe`, which
train@, tune@, agreement and every remedy call), the runs per seed with the learning rate chosen on
validation (`protocol`), `train@<strategy>` as one call (`run.train_stage`), and in-pipeline source
pre-training (`pretraining`, including domain-adaptive masked-LM pre-training of a text encoder); the dense
tasks' protocol (`dense`: rate on validation, cosine runs per seed, best validation epoch).

Layer: above `strategies`. May import `params`, `core`, `data`, `models` and `strategies`.
"""
