"""Monitoring: drift_report, drift_check, drift_job, drift_schedule and drift_retrain_sensor."""
