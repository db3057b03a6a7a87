"""Reading shard sets for training: checks before a pipeline starts, a bounded local cache for S3 shards."""
