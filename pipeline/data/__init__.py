"""Reading shard sets for training: epoch order, the S3 cache and read-ahead, the backends.

Reading shard sets for training (opened and checked by data_prep.shardset.reader): epoch order, a bounded
node-shared cache and read-ahead for S3 shards, the backends."""
