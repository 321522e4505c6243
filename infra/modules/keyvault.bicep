// Key Vault with the two secrets the bridge needs. The container app references them as Container Apps
// secrets (keyVaultUrl + identity), so their values never appear in the app's configuration.
param name string
param location string
param tags object
param readerPrincipalId string

@secure()
param twilioAuthToken string

@secure()
param bridgeAdminToken string

var secretsUserRole = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_109: Container Apps reads the secrets from an environment with no virtual network and no fixed outbound address; access is by Entra RBAC (Key Vault Secrets User) only
  //checkov:skip=CKV_AZURE_189: as CKV_AZURE_109: the public endpoint is needed without a virtual network
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource twilioSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  //checkov:skip=CKV_AZURE_41: the token's lifetime is Twilio's (or the operator's), not the vault's; an expiry date would stop the bridge from reading it at a restart
  parent: vault
  name: 'twilio-auth-token'
  properties: {
    value: twilioAuthToken
    contentType: 'text/plain'
  }
}

resource adminSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  //checkov:skip=CKV_AZURE_41: the token's lifetime is Twilio's (or the operator's), not the vault's; an expiry date would stop the bridge from reading it at a restart
  parent: vault
  name: 'bridge-admin-token'
  properties: {
    value: bridgeAdminToken
    contentType: 'text/plain'
  }
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: vault
  name: guid(vault.id, readerPrincipalId, secretsUserRole)
  properties: {
    principalId: readerPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: secretsUserRole
  }
}

output name string = vault.name
// Versionless URIs: Container Apps picks up a rotated secret without a new deployment.
output twilioAuthTokenUri string = twilioSecret.properties.secretUri
output bridgeAdminTokenUri string = adminSecret.properties.secretUri
