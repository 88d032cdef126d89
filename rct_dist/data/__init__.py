"""Data: webdataset shards written from real datasets, and the loader that reads them by byte offset."""
