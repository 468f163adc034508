# Least-privilege roles, one per workload, assumed through IRSA by one Kubernetes service account each.
# Every S3 statement names the bucket or a prefix of it; none grants s3:* or Resource "*".
#
#   code location  webserver, daemon, code server, CPU run pods: reads the whole storage root, publishes
#                  assets, reads new raw data and request logs, writes compute logs
#   training       train_job's GPU pod: reads assets (splits, base model), publishes lora_adapter,
#                  writes and rotates checkpoints, writes its compute logs
#   model server   reads published assets, appends request logs
#   mlflow         owns the MLflow artifact prefix

locals {
  bucket_arn  = aws_s3_bucket.artifacts.arn
  root        = var.storage_prefix
  root_arn    = "${aws_s3_bucket.artifacts.arn}/${var.storage_prefix}"
  logs_arn    = "${aws_s3_bucket.artifacts.arn}/${var.compute_logs_prefix}"
  oidc_issuer = trimprefix(var.eks_oidc_provider_url, "https://")
}

data "aws_iam_policy_document" "kms_use" {
  statement {
    sid       = "UseArtifactKey"
    effect    = "Allow"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.artifacts.arn]
  }
}

# ---------------------------------------------------------------- code location
data "aws_iam_policy_document" "code_location" {
  source_policy_documents = [data.aws_iam_policy_document.kms_use.json]

  statement {
    sid       = "ListStorageRootAndComputeLogs"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.root}/*", "${var.compute_logs_prefix}/*"]
    }
  }

  statement {
    sid       = "ReadStorageRoot"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${local.root_arn}/*"]
  }

  statement {
    sid     = "PublishAssets"
    effect  = "Allow"
    actions = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = [
      "${local.root_arn}/assets/*",
    ]
  }

  statement {
    sid       = "ComputeLogs"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"]
    resources = ["${local.logs_arn}/*"]
  }
}

# ---------------------------------------------------------------- training job
data "aws_iam_policy_document" "training" {
  source_policy_documents = [data.aws_iam_policy_document.kms_use.json]

  statement {
    sid       = "ListAssetsAndCheckpoints"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.root}/assets/*", "${local.root}/checkpoints/*"]
    }
  }

  statement {
    sid       = "ReadAssets"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${local.root_arn}/assets/*"]
  }

  statement {
    sid       = "PublishAdapter"
    effect    = "Allow"
    actions   = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = ["${local.root_arn}/assets/lora_adapter/*"]
  }

  statement {
    sid = "Checkpoints"
    # Delete: the trainer rotates old checkpoints (save_total_limit).
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.root_arn}/checkpoints/*"]
  }

  statement {
    sid       = "WriteComputeLogs"
    effect    = "Allow"
    actions   = ["s3:PutObject", "s3:AbortMultipartUpload"]
    resources = ["${local.logs_arn}/*"]
  }
}

# ---------------------------------------------------------------- model server
data "aws_iam_policy_document" "model_server" {
  source_policy_documents = [data.aws_iam_policy_document.kms_use.json]

  statement {
    sid       = "ListAssets"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.root}/assets/*"]
    }
  }

  statement {
    sid       = "ReadPublishedModels"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["${local.root_arn}/assets/*"]
  }

  statement {
    sid       = "AppendRequestLogs"
    effect    = "Allow"
    actions   = ["s3:PutObject"]
    resources = ["${local.root_arn}/request_logs/*"]
  }
}

# ---------------------------------------------------------------- mlflow server
data "aws_iam_policy_document" "mlflow" {
  source_policy_documents = [data.aws_iam_policy_document.kms_use.json]

  statement {
    sid       = "ListMlflowArtifacts"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.root}/mlflow/*"]
    }
  }

  statement {
    sid       = "MlflowArtifacts"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.root_arn}/mlflow/*"]
  }
}

# ---------------------------------------------------------------- IRSA roles
locals {
  workloads = {
    code_location = {
      role_name       = "llmft-code-location"
      service_account = var.service_accounts.code_location
      policy          = data.aws_iam_policy_document.code_location.json
    }
    training = {
      role_name       = "llmft-training"
      service_account = var.service_accounts.training
      policy          = data.aws_iam_policy_document.training.json
    }
    model_server = {
      role_name       = "llmft-model-server"
      service_account = var.service_accounts.model_server
      policy          = data.aws_iam_policy_document.model_server.json
    }
    mlflow = {
      role_name       = "llmft-mlflow"
      service_account = var.service_accounts.mlflow
      policy          = data.aws_iam_policy_document.mlflow.json
    }
  }
}

data "aws_iam_policy_document" "assume" {
  for_each = local.workloads

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${each.value.service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "workload" {
  for_each = local.workloads

  name               = each.value.role_name
  assume_role_policy = data.aws_iam_policy_document.assume[each.key].json
}

resource "aws_iam_role_policy" "workload" {
  for_each = local.workloads

  name   = "${each.value.role_name}-storage"
  role   = aws_iam_role.workload[each.key].id
  policy = each.value.policy
}
