# The whole agentplane platform on AWS: KMS key, SQS queue + DLQ, an EKS cluster with a GPU node
# pool, and in the cluster the runtime, the KEDA scaler, the default policy and one device.
# Apply in two steps (see README.md): the cluster first, then everything in it.

provider "agentplane" {
  region = var.region

  # A kubeconfig written by `aws eks update-kubeconfig` (its exec plugin fetches EKS tokens).
  kubernetes {
    config_path    = var.kubeconfig
    config_context = var.kube_context
  }
}

resource "agentplane_kms_key" "secrets" {
  description         = "${var.name} secrets"
  alias               = "alias/${var.name}"
  enable_key_rotation = true
}

resource "agentplane_queue" "tasks" {
  name                       = "${var.name}-tasks"
  visibility_timeout_seconds = 300
  receive_wait_time_seconds  = 20
  kms_master_key_id          = agentplane_kms_key.secrets.key_id
  max_receive_count          = 5
}

resource "agentplane_cluster" "main" {
  name                   = var.name
  role_arn               = var.cluster_role_arn
  subnet_ids             = var.subnet_ids
  encryption_kms_key_arn = agentplane_kms_key.secrets.arn
}

resource "agentplane_gpu_node_pool" "gpu" {
  cluster_name   = agentplane_cluster.main.name
  name           = "gpu"
  node_role_arn  = var.node_role_arn
  subnet_ids     = var.subnet_ids
  instance_types = ["g5.xlarge"]
  capacity_type  = "SPOT"
  min_size       = 0
  max_size       = 4
}

resource "agentplane_platform" "runtime" {
  namespace                  = "agentplane"
  image                      = var.image
  queue_url                  = agentplane_queue.tasks.url
  dlq_url                    = agentplane_queue.tasks.dlq_url
  visibility_timeout_seconds = agentplane_queue.tasks.visibility_timeout_seconds
  max_receive_count          = agentplane_queue.tasks.max_receive_count
  region                     = var.region
  kms_key_arn                = agentplane_kms_key.secrets.arn
  gateway_service_type       = "LoadBalancer"
  gateway_credentials_secret = "agentplane-gateway-credentials"
  worker_secret_names        = ["openai-api-key"]

  operator_service_account_annotations = {
    "eks.amazonaws.com/role-arn" = var.operator_role_arn
  }
  worker_service_account_annotations = {
    "eks.amazonaws.com/role-arn" = var.worker_role_arn
  }

  model_tier {
    name                       = "large"
    endpoint_kind              = "openai"
    endpoint                   = "https://api.openai.com/v1"
    model                      = "gpt-4.1"
    price_per_1k_input_micros  = 2000
    price_per_1k_output_micros = 8000
    privacy_levels             = ["public"]
    secret_ref {
      name = "openai-api-key"
      key  = "token"
    }
  }
  model_tier {
    # e.g. vLLM's OpenAI-compatible server on the GPU pool
    name                       = "small"
    endpoint_kind              = "openai"
    endpoint                   = "https://vllm.models.svc/v1"
    price_per_1k_input_micros  = 200
    price_per_1k_output_micros = 400
    gpu                        = true
  }

  depends_on = [agentplane_gpu_node_pool.gpu]
}

resource "agentplane_keda_scaler" "workers" {
  namespace    = agentplane_platform.runtime.namespace
  queue_url    = agentplane_queue.tasks.url
  aws_region   = var.region
  min_replicas = 0
  max_replicas = 20
}

resource "agentplane_agent_policy" "default" {
  namespace        = agentplane_platform.runtime.namespace
  unlisted_intents = "Deny"
  approvers        = var.approvers

  intent {
    type = "summarize"
    rate_limit {
      scope          = "user"
      requests       = 100
      period_seconds = 3600
    }
  }

  model {
    name                       = "large"
    endpoint_kind              = "openai"
    endpoint                   = "https://api.openai.com/v1"
    price_per_1k_input_micros  = 2000
    price_per_1k_output_micros = 8000
  }
  model {
    name                       = "small"
    endpoint_kind              = "openai"
    endpoint                   = "https://vllm.models.svc/v1"
    price_per_1k_input_micros  = 200
    price_per_1k_output_micros = 400
    gpu                        = true
  }

  budget {
    scope        = "user"
    limit_micros = 5000000
    period       = "Day"
  }
}
