"""Target data: the dataset-loader registry (`loaders`: fashion_mnist, mnist_digits, imagefolder, tweets,
csv), deduplicated stratified seeded splits saved pre-decoded and read back (`splits`), and the
tokenizer side of the text modality (`tokenize`: texts -> token ids, once, in `prepare`).

Layer: above `core`. May import `params` and `core`; never models, training or anything above.
"""
