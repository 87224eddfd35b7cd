"""Source models and running them: the source-kind registry (`sources`: packaged, timm, checkpoint,
random_init, pipeline, hf), text encoders with timm's interface (`text_encoder`), batches, features and
predictions (`inference`), and the cost profile of a candidate (`costs`: parameters, FLOPs, latency).

Layer: above `data`. May import `params`, `core` and `data`; never strategies, training or above.
"""
