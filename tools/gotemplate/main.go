// tunery-gotemplate renders an Ollama chat TEMPLATE with Go's text/template, the engine Ollama itself uses, so
// tunery can check that a Modelfile renders conversations exactly as the model's Hugging Face chat template does.
//
// Input on stdin, JSON: {"template": "...", "conversations": [[{"role": "user", "content": "..."}, ...], ...]}.
// Output on stdout, JSON: a list with one rendered prompt per conversation. Messages are prepared as Ollama
// prepares them before rendering: system messages are also joined into .System, and consecutive messages of one
// role are merged with a blank line between them.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template      string      `json:"template"`
	Conversations [][]message `json:"conversations"`
}

func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad request:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(1)
	}
	out := make([]string, 0, len(req.Conversations))
	for _, conv := range req.Conversations {
		system, msgs := collate(conv)
		var b strings.Builder
		data := map[string]any{"System": system, "Messages": msgs, "Prompt": "", "Response": "", "Tools": nil}
		if err := tmpl.Execute(&b, data); err != nil {
			fmt.Fprintln(os.Stderr, "template does not render:", err)
			os.Exit(1)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
