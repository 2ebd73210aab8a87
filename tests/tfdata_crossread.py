"""The TensorFlow side of the tf.data cross-read (tests/test_tfdata_crossread.py runs it).

Runs under a Python that has TensorFlow (its own venv in CI, see .ci/run) and nothing of this project, so it
imports only TensorFlow, NumPy and the standard library:

    python tests/tfdata_crossread.py --spec spec.json --payloads payloads.json --output OUT \
        --corrupt damaged.tfrecord shard-00000.tfrecord shard-00001.tfrecord ...

It reads the shards with `tf.data.TFRecordDataset` (which checks every length and data CRC) and parses each
record with `tf.io.parse_single_example` against the spec, {key: [kind, length or null]}. OUT/records.json gets
every parsed feature (bytes as SHA-256 hex digests, to keep it small), OUT/first_frames.npy the first JPEG
frame of every record decoded by TensorFlow, and OUT/tf_written.tfrecord the payloads (hex strings) written by
`tf.io.TFRecordWriter`. records.json also says whether reading the `--corrupt` file raised tf's DataLossError.
"""

import argparse
import hashlib
import json
import pathlib

import numpy as np
import tensorflow as tf

KINDS = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}


def feature_spec(spec: dict) -> dict:
    return {key: tf.io.FixedLenFeature([length], KINDS[kind]) if length else tf.io.VarLenFeature(KINDS[kind])
            for key, (kind, length) in spec.items()}


def plain_values(tensor) -> list:
    values = tf.sparse.to_dense(tensor) if isinstance(tensor, tf.SparseTensor) else tensor
    values = values.numpy().tolist()
    return [hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else v for v in values]


def corruption_detected(path: str) -> bool:
    try:
        for _ in tf.data.TFRecordDataset([path]):
            pass
    except tf.errors.DataLossError:
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--spec", required=True, type=pathlib.Path)
    parser.add_argument("--payloads", required=True, type=pathlib.Path)
    parser.add_argument("--corrupt", required=True)
    parser.add_argument("--output", required=True, type=pathlib.Path)
    args = parser.parse_args()

    spec = feature_spec(json.loads(args.spec.read_text()))
    records, first_frames = [], []
    for data in tf.data.TFRecordDataset(args.shards):
        parsed = tf.io.parse_single_example(data, spec)
        records.append({key: plain_values(value) for key, value in parsed.items()})
        first_jpeg = tf.sparse.to_dense(parsed["video/frames"])[0]
        first_frames.append(tf.io.decode_jpeg(first_jpeg, dct_method="INTEGER_ACCURATE").numpy())

    args.output.mkdir(parents=True, exist_ok=True)
    np.save(args.output / "first_frames.npy", np.stack(first_frames))
    with tf.io.TFRecordWriter(str(args.output / "tf_written.tfrecord")) as writer:
        for payload in json.loads(args.payloads.read_text()):
            writer.write(bytes.fromhex(payload))
    summary = {"tensorflow": tf.__version__, "records": records,
               "corrupt_file_raised_data_loss": corruption_detected(args.corrupt)}
    (args.output / "records.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
