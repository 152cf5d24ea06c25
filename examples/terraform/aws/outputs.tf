output "cluster_endpoint" {
  value = agentplane_cluster.main.endpoint
}

output "oidc_issuer" {
  description = "For the IRSA trust policies of the operator and worker roles."
  value       = agentplane_cluster.main.oidc_issuer
}

output "queue_url" {
  value = agentplane_queue.tasks.url
}

output "gateway_url" {
  description = "In-cluster URL; devices use the LoadBalancer's address (kubectl -n agentplane get service agentplane-gateway)."
  value       = agentplane_platform.runtime.gateway_service
}

output "join_token_instruction" {
  value = <<-EOT
    Create a one-time join token for the gateway, then enroll a device with it:

      TOKEN=$(openssl rand -hex 24)
      kubectl -n ${agentplane_platform.runtime.namespace} create secret generic ${agentplane_platform.runtime.gateway_credentials_secret} \
        --from-literal=AGENTPLANE_JOIN_TOKEN=$TOKEN
      kubectl -n ${agentplane_platform.runtime.namespace} rollout restart deployment/agentplane-gateway
      GATEWAY=https://$(kubectl -n ${agentplane_platform.runtime.namespace} get service agentplane-gateway \
        -o jsonpath='{.status.loadBalancer.ingress[0].hostname}')

      sudo agentplane-edge install --gateway $GATEWAY --token $TOKEN --device-id <device id> --owner <user>
  EOT
}
