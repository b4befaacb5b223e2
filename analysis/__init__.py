"""Reading a study back from MLflow: tables, trade-off plots and the written finding (in progress)."""
