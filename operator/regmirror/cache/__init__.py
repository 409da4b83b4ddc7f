"""The cache sidecar (`regmirror cache serve`): stdlib only, it runs next to distribution in each mirror pod."""
