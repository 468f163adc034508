variable "region" {
  description = "AWS region of the bucket and roles."
  type        = string
  default     = "eu-west-1"
}

variable "bucket_name" {
  description = "Globally unique name of the llmft artifact bucket."
  type        = string
}

variable "storage_prefix" {
  description = "Prefix of the llmft storage root inside the bucket (LLMFT_STORAGE=s3://<bucket>/<prefix>)."
  type        = string
  default     = "llmft"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_-]*$", var.storage_prefix))
    error_message = "storage_prefix must be one path segment of lowercase letters, digits, '-' or '_'."
  }
}

variable "compute_logs_prefix" {
  description = "Prefix of Dagster's S3ComputeLogManager (computeLogManager.config.s3ComputeLogManager.prefix)."
  type        = string
  default     = "dagster/compute-logs"
}

variable "noncurrent_version_retention_days" {
  description = "Days an overwritten or deleted object version is kept before it expires."
  type        = number
  default     = 30
}

variable "noncurrent_versions_to_keep" {
  description = "Newest noncurrent versions of each object kept regardless of age."
  type        = number
  default     = 3
}

variable "checkpoint_retention_days" {
  description = "Days training checkpoints are kept (published adapters are kept)."
  type        = number
  default     = 14
}

variable "compute_log_retention_days" {
  description = "Days Dagster compute logs are kept."
  type        = number
  default     = 90
}

variable "request_log_ia_days" {
  description = "Days after which served request logs move to STANDARD_IA."
  type        = number
  default     = 30
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (IRSA)."
  type        = string
}

variable "eks_oidc_provider_url" {
  description = "Issuer URL of the EKS cluster's OIDC provider, without https://."
  type        = string
}

variable "namespace" {
  description = "Kubernetes namespace of the llmft workloads."
  type        = string
  default     = "llmft"
}

variable "service_accounts" {
  description = "Kubernetes service accounts bound to the roles."
  type = object({
    code_location = string
    training      = string
    model_server  = string
    mlflow        = string
  })
  default = {
    code_location = "llmft-dagster"
    training      = "llmft-train"
    model_server  = "llmft-serve"
    mlflow        = "llmft-mlflow"
  }
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default = {
    project = "llmft"
  }
}
