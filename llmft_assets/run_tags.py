"""The tags llmft puts on the runs its sensors start (what started a run, and from which input)."""

TAG_TRIGGER = "llmft/trigger"
TAG_DRIFT_REPORT = "llmft/drift_report_version"
TAG_RETRAIN_STAGE = "llmft/retrain_stage"
TAG_RETRAINING_DATASET = "llmft/retraining_dataset_version"
TAG_INCOMING_DROP = "llmft/incoming_drop"
TAG_INCOMING_FINGERPRINT = "llmft/incoming_fingerprint"
