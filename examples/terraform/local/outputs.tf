output "queue_url" {
  value = agentplane_queue.tasks.url
}

output "dlq_url" {
  value = agentplane_queue.tasks.dlq_url
}

output "kms_key_arn" {
  value = agentplane_kms_key.secrets.arn
}

output "queue_arn_from_data_source" {
  value = data.agentplane_queue.tasks.arn
}
