"""The training stage, Ray-free: the one training loop (`loop`), dataset and model set-up for a run
(`runner`), experiment trackers (`tracking`), the Tune search space and result tables (`sweep`) and
what an exported model directory contains (`export`)."""
