# The decision document agentplane reads: data.agentplane.decision =
#   {"allow": bool, "require_approval": bool, "reasons": [string]}
# `input.kind` is "admission" (a new intent) or "tool_call" (a plan's next tool call).
package agentplane

import rego.v1

default decision := {"allow": true, "require_approval": false, "reasons": []}

decision := {"allow": false, "reasons": sort([r | some r in deny])} if count(deny) > 0

decision := {"allow": true, "require_approval": true, "reasons": sort([r | some r in review])} if {
	count(deny) == 0
	count(review) > 0
}

# Admissions.

deny contains sprintf("intent %q is not offered to user %q", [input.intent.type, input.user.id]) if {
	input.kind == "admission"
	input.intent.type in {"wire-money", "delete-account"}
}

deny contains "public intents may not carry health data" if {
	input.kind == "admission"
	input.privacyLevel == "public"
	"health" in input.consent.scopes
}

review contains sprintf("%d GPUs need a second pair of eyes", [input.requiredResources.gpu]) if {
	input.kind == "admission"
	input.requiredResources.gpu > 1
}

# Tool calls.

deny contains sprintf("%s/%s may only touch /srv/shared", [input.tool.server, input.tool.name]) if {
	input.kind == "tool_call"
	input.tool.server == "fs"
	not startswith(object.get(input.tool.arguments, "path", ""), "/srv/shared/")
}

review contains "writes are reviewed" if {
	input.kind == "tool_call"
	endswith(input.tool.name, "write_file")
}
