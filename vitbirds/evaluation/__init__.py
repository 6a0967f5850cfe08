"""The evaluation stage: classification metrics (`metrics`) and the evaluation run with its
figures and HTML report (`evaluate`)."""
