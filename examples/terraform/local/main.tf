# The agentplane cloud side against the local stack (ci/stack.sh up): a KMS key for worker
# secrets and the task queue with its dead-letter queue.
#
#   eval "$(ci/stack.sh env)"        # or read AWS_ENDPOINT_URL from stack.env
#   terraform init && terraform apply -var aws_endpoint=$AWS_ENDPOINT_URL

provider "agentplane" {
  region     = "us-east-1"
  access_key = "testing" # moto accepts any keys; never put real keys here
  secret_key = "testing"

  endpoints {
    sqs = var.aws_endpoint
    kms = var.aws_endpoint
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
