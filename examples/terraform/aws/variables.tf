variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "name" {
  description = "Name of the cluster and prefix of the AWS objects."
  type        = string
  default     = "agentplane"
}

variable "cluster_role_arn" {
  description = "IAM role of the EKS control plane (AmazonEKSClusterPolicy)."
  type        = string
}

variable "node_role_arn" {
  description = "IAM role of the GPU nodes (AmazonEKSWorkerNodePolicy, AmazonEC2ContainerRegistryReadOnly, AmazonEKS_CNI_Policy)."
  type        = string
}

variable "subnet_ids" {
  description = "At least two subnets in different availability zones."
  type        = set(string)
}

variable "operator_role_arn" {
  description = "IRSA role of the operator: sqs:SendMessage and sqs:GetQueueAttributes on the queue."
  type        = string
}

variable "worker_role_arn" {
  description = "IRSA role of the workers: sqs:ReceiveMessage, DeleteMessage, ChangeMessageVisibility, GetQueueAttributes; kms:Decrypt, kms:GenerateDataKey."
  type        = string
}

variable "image" {
  type    = string
  default = "ghcr.io/agentplane/agentplane:0.1.0"
}

variable "approvers" {
  type    = list(string)
  default = []
}

variable "kubeconfig" {
  description = "Kubeconfig written by `aws eks update-kubeconfig --name <name>`."
  type        = string
  default     = "~/.kube/config"
}

variable "kube_context" {
  description = "Its context for the cluster (the cluster ARN by default)."
  type        = string
  default     = null
}
