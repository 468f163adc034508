"""Data: raw -> cleaned -> validated -> tokenized -> splits, the base model, their checks, data_job and
the incoming-data sensor."""
