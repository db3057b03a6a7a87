"""data_prep: ImageNet-22K / ImageFolder sources into verified webdataset shards (see README, "Shard format")."""
