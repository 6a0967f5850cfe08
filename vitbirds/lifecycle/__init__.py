"""The lifecycle stage: what happens to a model between the stages that make and use it, with no
Ray and no training code: experiment tracking behind one interface (`tracking`), the MLflow model
registry and its aliases (`registry`), and the model store (`store`), where every model reference
(a directory, a run, gs://, models:/NAME@alias) becomes a verified local model directory and a
deployment pins the version it resolved."""
