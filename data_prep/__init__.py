"""data_prep: ImageNet-22K / ImageFolder sources into verified webdataset shards (see docs/shard_format.md)."""
