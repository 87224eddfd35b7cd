"""Target data: the dataset-loader registry (`loaders`: fashion_mnist, mnist_digits, imagefolder, tweets,
csv), deduplicated stratified seeded splits saved pre-decoded and read back (`splits`), and the
tokenizer side of the text modality (`tokenize`: texts -> token ids, once, in `prepare`); the dense tasks'
data (`dense`: the prepared layout, `scenes`: the offline scene generator, `coco`: a COCO data set).

Layer: above `core`. May import `params` and `core`; never models, training or anything above.
"""
