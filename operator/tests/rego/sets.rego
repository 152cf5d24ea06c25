# Sets, set operations, comprehensions, `some ... in`, `every`, and default rules.
package agentplane

import rego.v1

blocked_types := {"delete-everything", "wire-money"}

sensitive_scopes := {"contacts", "location", "health"}

granted := {s | some s in input.consent.scopes}

sensitive_granted := granted & sensitive_scopes

reasons contains msg if {
	input.intent.type in blocked_types
	msg := sprintf("intent type %s is blocked", [input.intent.type])
}

reasons contains msg if {
	input.privacyLevel == "public"
	some s in sensitive_granted
	msg := sprintf("scope %s may not be used with public privacy", [s])
}

default approval := false

approval if count(sensitive_granted) >= 2

approval if {
	count(input.intent.params.tags) > 0
	every t in input.intent.params.tags {
		startswith(t, "urgent")
	}
}

default clean := false

clean if count(reasons) == 0

decision := {
	"allow": clean,
	"require_approval": approval,
	"reasons": sort([r | some r in reasons]),
} if input.kind == "admission"

decision := {"allow": true, "require_approval": false, "reasons": []} if input.kind == "tool_call"
