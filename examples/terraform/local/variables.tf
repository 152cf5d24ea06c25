variable "aws_endpoint" {
  description = "The local stack's AWS endpoint (moto), e.g. AWS_ENDPOINT_URL from ci/stack.sh's stack.env."
  type        = string
  default     = "http://127.0.0.1:5000"
}

variable "name" {
  description = "Prefix for every object this example creates."
  type        = string
  default     = "agentplane-local"
}
