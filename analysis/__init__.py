"""Reading a study back from MLflow: the trial table, the trade-off plots and the written finding."""
