"""The evaluation stage: classification metrics (`metrics`), the evaluation run (`evaluate`), its
figures (`figures`) and record (`report`: metrics.json, report.html), the one HTML page builder
every report uses (`html_page`), precision agreement (`agreement`) and paired model comparison
(`compare`)."""
