"""Datasets and input pipelines.

`voc` and `scenes`: TFDS builders (array_record); `sources`: prepare / open / decode;
`prepare`: the command line; `transforms`: NumPy augmentations; `pipeline`: grain
input pipelines and global sharded batches. See docs/data.md.
"""
