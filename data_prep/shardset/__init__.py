"""The shard-set contract that `data_prep` writes and training reads.

The shard-set contract that `data_prep` writes and training reads: where a set lives (store.py: a folder or an
S3 prefix), its table of contents (manifest.py), the DALI index file of each shard (index.py), the one sample
index per split (split_index.py), the label layout (layout.py), and a split opened and checked for reading
(reader.py: open_shard_set). Knows nothing of training; `pipeline/` imports nothing else from data_prep."""
