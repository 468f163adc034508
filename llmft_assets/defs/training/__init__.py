"""Training: lora_adapter, train_job (own executor, `gpu` pool) and train_sensor."""
