# Nested input, default values, functions, object lookups, arithmetic and regex.
package agentplane

import rego.v1

default max_tokens := 1000

max_tokens := input.intent.params.maxTokens if is_number(input.intent.params.maxTokens)

limits := {"public": 4000, "regulated": 2000, "private": 500}

default gpus := 0

gpus := input.requiredResources.gpu

device_ok(id) if regex.match(`^dev-[0-9]+$`, id)

default over_limit := false

over_limit if max_tokens > limits[input.privacyLevel]

default foreign_device := false

foreign_device if not device_ok(input.device.id)

default heavy := false

heavy if gpus * max_tokens > 6000

checks := [
	{"failed": over_limit, "msg": sprintf("maxTokens %d over %d for %s", [max_tokens, limits[input.privacyLevel], input.privacyLevel])},
	{"failed": foreign_device, "msg": sprintf("device %s is not a fleet device", [input.device.id])},
	{"failed": heavy, "msg": "too much GPU work"},
]

failed := [c.msg | some c in checks; c.failed]

default passed := false

passed if count(failed) == 0

review if gpus > 1

review if object.get(input.requiredResources, "model", "") == "large"

default decision := {"allow": true}

decision := {"allow": passed, "require_approval": true, "reasons": failed} if {
	input.kind == "admission"
	review
}

decision := {"allow": passed, "require_approval": false, "reasons": failed} if {
	input.kind == "admission"
	not review
}

decision := {"allow": tool_allowed, "reasons": [sprintf("%s/%s", [input.tool.server, input.tool.name])]} if input.kind == "tool_call"

default tool_allowed := false

tool_allowed if {
	input.tool.server == "fs"
	every k, v in input.tool.arguments {
		is_string(v)
		count(k) < 10
	}
}
