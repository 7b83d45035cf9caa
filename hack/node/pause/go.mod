// The sandbox ("pause") binary of the dev cluster's real node. Standard library only.
module tensorwasm.io/hack/node/pause

go 1.26.0
