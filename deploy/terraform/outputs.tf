output "bucket_name" {
  description = "The artifact bucket."
  value       = aws_s3_bucket.artifacts.bucket
}

output "llmft_storage" {
  description = "Value of LLMFT_STORAGE for every llmft workload."
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/${var.storage_prefix}"
}

output "mlflow_artifacts_destination" {
  description = "Value of MLFLOW_ARTIFACTS_DESTINATION for the MLflow server."
  value       = "s3://${aws_s3_bucket.artifacts.bucket}/${var.storage_prefix}/mlflow"
}

output "kms_key_arn" {
  description = "KMS key encrypting the bucket."
  value       = aws_kms_key.artifacts.arn
}

output "code_location_role_arn" {
  description = "eks.amazonaws.com/role-arn of service account llmft-dagster."
  value       = aws_iam_role.workload["code_location"].arn
}

output "training_role_arn" {
  description = "eks.amazonaws.com/role-arn of service account llmft-train."
  value       = aws_iam_role.workload["training"].arn
}

output "model_server_role_arn" {
  description = "eks.amazonaws.com/role-arn of service account llmft-serve."
  value       = aws_iam_role.workload["model_server"].arn
}

output "mlflow_role_arn" {
  description = "eks.amazonaws.com/role-arn of service account llmft-mlflow."
  value       = aws_iam_role.workload["mlflow"].arn
}
