"""Where a data layer's records come from: IDX files and in-memory arrays (``idx``), Caffe's
LMDB/LevelDB Datum databases (``db``), images (``images``), transform_param (``transform``)
and finding a source on disk (``sources``)."""
