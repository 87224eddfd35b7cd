"""Source models and running them: the source-kind registry (`sources`: packaged, timm, checkpoint,
random_init, pipeline, hf), text encoders with timm's interface (`text_encoder`), batches, features and
predictions (`inference`), the features cache of `features@` (`features`: extract, write, the one reader),
BatchNorm running statistics (`batchnorm`: used by AdaBN and the BN-gap measure),
the cost profile of a candidate (`costs`: parameters, FLOPs, latency), progressive networks' two columns
(`columns`: a frozen source column, a new one, lateral adapters; timm's interface), and dense models
(`dense`: the source's features_only encoder, an FPN-style decoder, CenterNet or per-pixel heads).

Layer: above `data`. May import `params`, `core` and `data`; never strategies, training or above.
"""
