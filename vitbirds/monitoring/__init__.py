"""The monitoring stage: the prediction log Serve writes (`predictions`), the reference profile
exported with a model (`reference`), the statistical tests (`drift`), the OK/WATCH/RETRAIN
assessment (`assess`) and its HTML report (`report`)."""
