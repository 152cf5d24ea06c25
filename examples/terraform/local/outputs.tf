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

output "namespace" {
  value = agentplane_platform.runtime.namespace
}

# What the edge installer needs: where the gateway is...
output "gateway_url" {
  description = "In-cluster URL of the gateway; expose it (LoadBalancer Service, Ingress, port-forward) for devices outside the cluster."
  value       = agentplane_platform.runtime.gateway_service
}

# ...and how to get a join token to it.
output "join_token_instruction" {
  value = <<-EOT
    Create a one-time join token for the gateway, then enroll a device with it:

      TOKEN=$(openssl rand -hex 24)
      kubectl -n ${agentplane_platform.runtime.namespace} create secret generic ${agentplane_platform.runtime.gateway_credentials_secret} \
        --from-literal=AGENTPLANE_JOIN_TOKEN=$TOKEN
      kubectl -n ${agentplane_platform.runtime.namespace} rollout restart deployment/agentplane-gateway

      sudo agentplane-edge install --gateway <gateway URL as devices reach it> --token $TOKEN \
        --device-id <device id> --owner <user>

    In the cluster the gateway is ${agentplane_platform.runtime.gateway_service}.
  EOT
}

output "demo_device" {
  value = agentplane_edge_device.demo.id
}
