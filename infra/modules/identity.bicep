// The bridge's user-assigned managed identity: it pulls the image, reads the Key Vault secrets, calls
// Azure OpenAI, signs in to PostgreSQL and writes blobs. The app finds it through AZURE_CLIENT_ID.
param name string
param location string
param tags object

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
