# String builtins over the prompt and a tool call's arguments.
package agentplane

import rego.v1

words := [w | some w in split(trim_space(lower(input.intent.prompt)), " "); w != ""]

bad_words := {"password", "ssn", "secret"}

hits := sort({w | some w in words; w in bad_words})

shouty if {
	upper(input.intent.prompt) == input.intent.prompt
	count(input.intent.prompt) > 0
}

default decision := {"allow": true, "reasons": []}

decision := {"allow": false, "reasons": [concat(", ", hits)]} if {
	input.kind == "admission"
	count(hits) > 0
}

decision := {
	"allow": true,
	"require_approval": true,
	"reasons": [sprintf("%d words, starts with %q", [count(words), substring(concat(" ", words), 0, 12)])],
} if {
	input.kind == "admission"
	count(hits) == 0
	count(words) > 12
}

decision := {"allow": false, "reasons": [sprintf("%s outside /tmp", [replace(input.tool.arguments.path, "/", ":")])]} if {
	input.kind == "tool_call"
	not startswith(input.tool.arguments.path, "/tmp/")
	not endswith(input.tool.arguments.path, ".log")
}

decision := {"allow": true, "require_approval": true, "reasons": ["a log file"]} if {
	input.kind == "tool_call"
	not startswith(input.tool.arguments.path, "/tmp/")
	endswith(input.tool.arguments.path, ".log")
	indexof(input.tool.arguments.path, "secret") == -1
}

decision := {"allow": false, "reasons": ["secret log"]} if {
	input.kind == "tool_call"
	not startswith(input.tool.arguments.path, "/tmp/")
	endswith(input.tool.arguments.path, ".log")
	indexof(input.tool.arguments.path, "secret") != -1
}
