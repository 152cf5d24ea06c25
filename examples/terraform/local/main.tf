# The whole agentplane platform against the local stack (ci/stack.sh up): moto plays AWS
# (KMS key, SQS queue + DLQ) and a bare kube-apiserver plays the cluster (CRDs, runtime,
# KEDA scaler, a device, the policy). Install KEDA's CRDs first (kubectl apply --server-side -f
# shared/crds/keda/); nothing runs the pods locally, the objects are what is provisioned.
#
#   eval "$(ci/stack.sh env)"
#   terraform init
#   terraform apply -var aws_endpoint=$AWS_ENDPOINT_URL -var kubeconfig=$KUBECONFIG

provider "agentplane" {
  region     = "us-east-1"
  access_key = "testing" # moto accepts any keys; never put real keys here
  secret_key = "testing"

  endpoints {
    sqs = var.aws_endpoint
    kms = var.aws_endpoint
  }

  kubernetes {
    config_path = var.kubeconfig
  }
}

resource "agentplane_kms_key" "secrets" {
  description             = "${var.name} worker secrets"
  alias                   = "alias/${var.name}"
  enable_key_rotation     = true
  rotation_period_in_days = 180
  deletion_window_in_days = 7
  tags = {
    app = "agentplane"
  }
}

resource "agentplane_queue" "tasks" {
  name                       = "${var.name}-tasks"
  visibility_timeout_seconds = 120
  receive_wait_time_seconds  = 20
  kms_master_key_id          = agentplane_kms_key.secrets.key_id
  max_receive_count          = 5
  tags = {
    app = "agentplane"
  }
}

data "agentplane_queue" "tasks" {
  name = agentplane_queue.tasks.name
}

# The runtime: CRDs, operator, workers (scaled by KEDA below), gateway, RBAC, models ConfigMap.
resource "agentplane_platform" "runtime" {
  namespace                  = var.name
  image                      = var.image
  queue_url                  = agentplane_queue.tasks.url
  dlq_url                    = agentplane_queue.tasks.dlq_url
  visibility_timeout_seconds = agentplane_queue.tasks.visibility_timeout_seconds
  max_receive_count          = agentplane_queue.tasks.max_receive_count
  region                     = "us-east-1"
  aws_endpoint_url           = var.aws_endpoint
  kms_key_arn                = agentplane_kms_key.secrets.arn
  operator_replicas          = 1
  gateway_replicas           = 1
  # The join tokens edge devices enroll with (see the join_token_instruction output).
  gateway_credentials_secret = "${var.name}-gateway-credentials"

  model_tier {
    name          = "dev"
    endpoint_kind = "builtin"
    endpoint      = "builtin:echo"
  }
}

resource "agentplane_keda_scaler" "workers" {
  namespace    = agentplane_platform.runtime.namespace
  queue_url    = agentplane_queue.tasks.url
  aws_region   = "us-east-1"
  aws_endpoint = var.aws_endpoint
  min_replicas = 0
  max_replicas = 5
}

# A device managed as code; devices can also enroll themselves with a join token.
resource "agentplane_edge_device" "demo" {
  namespace       = agentplane_platform.runtime.namespace
  name            = "demo-device"
  owner           = "demo-owner"
  allowed_intents = ["summarize"]

  public_key {
    id  = "k1"
    key = var.demo_device_public_key
  }
}

resource "agentplane_agent_policy" "default" {
  namespace        = agentplane_platform.runtime.namespace
  unlisted_intents = "Deny"
  approvers        = ["demo-owner"]

  intent {
    type = "summarize"
    rate_limit {
      scope          = "device"
      requests       = 60
      period_seconds = 3600
    }
  }

  model {
    name          = "dev"
    endpoint_kind = "builtin"
    endpoint      = "builtin:echo"
  }

  budget {
    scope        = "user"
    limit_micros = 1000000
    period       = "Day"
  }

  # Five failed tasks within five minutes suspend the namespace (`suspend` becomes true and the
  # policy's status records why); set `suspend = false` again to resume.
  circuit_breaker {
    window_seconds = 300
    failures       = 5
  }
}
