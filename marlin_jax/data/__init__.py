"""Face-clip data. Import the module you need (kept apart so `data_prep` workers do not load JAX or grain):

* `tfrecord`        TFRecord framing: `RecordWriter`, `RecordReader` (CRC-checked), `read_records`.
* `schema`          the `tf.train.Example` of one stored clip: `ClipRecord`, `serialize_clip`, `parse_clip`.
* `codecs`          JPEG frames and PNG region maps.
* `shards`          the shard directory and its `manifest.json`.
* `pipeline`        `make_pretrain_loader`, the grain pretraining pipeline.
"""
