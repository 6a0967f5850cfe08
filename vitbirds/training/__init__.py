"""The training stage, Ray-free: the one training loop (`loop`), dataset and model set-up for a run
(`runner`), the Tune search space and result tables (`sweep`) and what an exported model directory
contains (`export`). Trackers and the model registry it logs to live below, in
`vitbirds.lifecycle`."""
