"""Evaluation: eval_report, its blocking eval_gate, release_job and release_sensor."""
