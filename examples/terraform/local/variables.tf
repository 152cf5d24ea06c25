variable "aws_endpoint" {
  description = "The local stack's AWS endpoint (moto), e.g. AWS_ENDPOINT_URL from ci/stack.sh's stack.env."
  type        = string
  default     = "http://127.0.0.1:5000"
}

variable "kubeconfig" {
  description = "Kubeconfig of the cluster, e.g. KUBECONFIG from ci/stack.sh's stack.env."
  type        = string
  default     = "~/.kube/config"
}

variable "name" {
  description = "Prefix for every object this example creates, and the runtime's namespace."
  type        = string
  default     = "agentplane-local"
}

variable "image" {
  description = "The agentplane runtime image."
  type        = string
  default     = "ghcr.io/agentplane/agentplane:0.1.0"
}

variable "demo_device_public_key" {
  description = "Base64 Ed25519 public key of the demo device. The default is RFC 8032's first test key, whose private key is public: local use only."
  type        = string
  default     = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
}
