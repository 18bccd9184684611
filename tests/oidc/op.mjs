// The real OpenID provider croft's OIDC tests run (npm oidc-provider): discovery, JWKS,
// the device-code grant (croft login), refresh tokens, and JWT access tokens for croft's
// API (RFC 8707 resource indicators), signed with the keys the test hands it, so that a
// test can rotate them by restarting the provider with another key set.
//
// Environment: OP_PORT, OP_KEYS (a file holding {"keys": [private JWKs]}, the first signs),
// OP_AUDIENCE (the access tokens' aud), OP_GROUPS (JSON {"login": ["group", ...]}),
// OP_AT_TTL (access token lifetime, seconds), OP_OPAQUE=1 (opaque access tokens for the
// userinfo endpoint instead of JWTs for croft's API: the userinfo endpoint of this provider
// takes no token issued for a resource server). devInteractions accepts any login.
import fs from 'node:fs';
import Provider from 'oidc-provider';

const port = Number(process.env.OP_PORT || 39090);
const issuer = `http://127.0.0.1:${port}`;
const audience = process.env.OP_AUDIENCE || 'urn:croft:api';
const groups = JSON.parse(process.env.OP_GROUPS || '{}');
const ttl = Number(process.env.OP_AT_TTL || 3600);
const opaque = process.env.OP_OPAQUE === '1';
const jwks = JSON.parse(fs.readFileSync(process.env.OP_KEYS, 'utf8'));

const oidc = new Provider(issuer, {
  jwks,
  clients: [
    { client_id: 'croft', token_endpoint_auth_method: 'none', response_types: [], redirect_uris: [],
      grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'] },
    { client_id: 'croft-svc', client_secret: 'croft-svc-secret', grant_types: ['client_credentials'],
      response_types: [], redirect_uris: [] },
  ],
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups', 'croft'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.test`, email_verified: true, name: id, groups: groups[id] || [] };
      },
    };
  },
  // Every access token carries the user's email and identity-provider groups.
  async extraTokenClaims(ctx, token) {
    if (!token.accountId) return {};
    return { email: `${token.accountId}@example.test`, groups: groups[token.accountId] || [] };
  },
  features: {
    clientCredentials: { enabled: true },
    deviceFlow: { enabled: true },
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => (opaque ? undefined : audience),
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'openid offline_access email profile croft',
        audience,
        accessTokenTTL: ttl,
        accessTokenFormat: 'jwt',
      }),
    },
  },
  ttl: { DeviceCode: 600, RefreshToken: 86400, IdToken: ttl, Grant: 86400, Session: 86400, Interaction: 600 },
});
oidc.on('server_error', (ctx, err) => console.error('server_error', err));
oidc.on('grant.error', (ctx, err) => console.error('grant.error', err));
oidc.listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
