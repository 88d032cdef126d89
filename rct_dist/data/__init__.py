"""Data: webdataset shards written from real datasets, and the streaming loader that reads them."""
