terraform {
  required_version = ">= 1.5.0"
  required_providers {
    agentplane = {
      source = "registry.terraform.io/agentplane/agentplane"
    }
  }
}
