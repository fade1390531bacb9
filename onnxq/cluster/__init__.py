"""Work spread over a Ray cluster with results identical to one process: calibration by shards.

`RayBackend` says where (a local instance, the cluster this machine belongs to, or a head's address) and
how wide (workers, CPUs and GPUs each). `Cluster` connects, `WorkerPool` holds the actors: each keeps one
model loaded (its ONNX Runtime sessions) for any kind of `Work`, and the driver-side scheduler hands out
items (shards), keeps the first result of each, resubmits what a dead worker lost and replaces the worker.
`calibrate_on_ray` is the calibration on top of it.

Ray is an optional extra (`pip install 'onnxq[ray]'`): nothing here imports it until a cluster is joined.
"""
